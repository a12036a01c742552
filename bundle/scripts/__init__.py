"""Python code of the chest X-ray lung and opacity bundle (imported as ``scripts`` with ``bundle/`` on ``sys.path``)."""
