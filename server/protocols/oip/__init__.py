"""The Open Inference Protocol (KServe v2, Triton): codec and transport-free handlers."""
