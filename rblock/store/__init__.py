"""Storage layer: the BlockDevice interface and the local volume that implements it."""
