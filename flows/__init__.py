"""The Prefect flow. Importing `stages` first pins portable CPU numerics before torch loads."""

import stages  # noqa: F401
