"""RemoteGPU Image: self-hosted, Kubernetes-native FLUX image generation."""

__version__ = "0.1.0"
