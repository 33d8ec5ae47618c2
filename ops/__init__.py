"""Pure tensor and byte operations: noise updates, projection, quantisation, image codec, metrics.

Nothing here imports Ray or touches storage; every function takes tensors or bytes and returns them.
"""
