"""Core types at the bottom of the import graph: a request, one forward pass's items and batch,
sampling parameters. They import nothing else of Adrenaline, so every layer above may use them."""
