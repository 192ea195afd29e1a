"""Web apps that use poolq: FastAPI (asyncio) and Flask (threads)."""
