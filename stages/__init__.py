"""The pipeline's stages. Importing the package first pins portable CPU numerics, before anything
can import torch (stages/numerics.py)."""

from stages import numerics

numerics.pin()
