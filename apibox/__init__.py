"""apibox: a self-hosted LLM API gateway with prepaid balances and exact billing."""

__version__ = "0.1.0"
