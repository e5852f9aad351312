"""moe-ray: DeepSeek-style Mixture-of-Experts training on Ray."""

__version__ = "0.1.0"
