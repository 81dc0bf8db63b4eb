"""Choosing a head: the grids, the CV search, the head factory, view/norm selection, repeated CV, the memory and solver choice."""
