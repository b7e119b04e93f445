"""The rh_trl reward server (``rh-trl serve --config configs/serve/<name>.yaml``; needs ``rh_trl[serve]``)."""

from rh_trl.serve.batcher import DynamicBatcher
from rh_trl.serve.config import RewardSpec, ServerConfig, build_reward, load_config

__all__ = [
    "DynamicBatcher",
    "RewardSpec",
    "ServerConfig",
    "build_reward",
    "create_app",
    "load_config",
    "serve",
]


def __getattr__(name: str):  # fastapi/uvicorn are imported only when the app is built
    if name in ("create_app", "serve"):
        from rh_trl.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'rh_trl.serve' has no attribute {name!r}")
