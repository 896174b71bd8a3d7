"""What the tests share besides fixtures (those stay in tests/conftest.py), one module a concern:

- data: synthetic IDX files and model weights for unit tests
- mirror: where the end-to-end tests find the real FashionMNIST files (and the download cache)
- tools: running dvc and other commands as a user would, processes, ports
- repo: copies of the project for tests that run or change it
- prefect: a real `prefect server` (via `make server`) and its REST API
"""
