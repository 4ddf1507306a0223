"""The optimization pipeline: turn one FP32 ONNX model into the best variant for a device class.

Passes (``optimize.passes``) transform models; the pipeline (``optimize.pipeline``) composes them
into candidate recipes, evaluates every candidate against the FP32 model and keeps the best one
that meets the accuracy budget.
"""
