"""Triton kernels. Importing this package imports triton: callers check
``fastdiff._backend.triton_available()`` first."""
