"""CUDA C++ sources, compiled at run time through CuPy NVRTC."""
