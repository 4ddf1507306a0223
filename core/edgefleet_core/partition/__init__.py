"""Partitioning a model between two compute units: cut points, splits and the planner.

``partition.cuts`` finds the valid cut points of an ONNX graph and splits a model into a head and a
tail that together compute exactly what the whole model does.
"""
