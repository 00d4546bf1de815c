"""genauth-monitor: configuration-drift monitoring for GenAuth email provider settings."""

__version__ = "0.1.0"

__all__ = ["__version__"]
