"""Flint: a serverless function platform for bare-metal fleets. Tenants import `Client` from here."""

from flint.client import AsyncClient, Client, InvokeResult

__all__ = ["AsyncClient", "Client", "InvokeResult"]
__version__ = "0.1.0"
