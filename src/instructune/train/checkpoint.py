"""Checkpoints for exact resume: trainable weights (safetensors), optimizer, scheduler, RNG and data position."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import replaced_folder


def save_checkpoint(folder: Path, named, optimizer, scheduler, state: dict, best_weights: dict | None = None) -> None:
    """Written into a temporary folder that then replaces `folder` whole: a kill at any point leaves either the
    old or the new checkpoint complete."""
    from safetensors.torch import save_file

    with replaced_folder(folder) as tmp:
        save_file({n: p.detach().contiguous() for n, p in named}, str(tmp / "trainable.safetensors"))
        if best_weights is not None:
            save_file({n: w.contiguous() for n, w in best_weights.items()}, str(tmp / "best.safetensors"))
        torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "state.pt")


def load_checkpoint(folder: Path, named, optimizer, scheduler) -> tuple[dict, dict | None]:
    """Restore weights, optimizer, scheduler and RNG; returns the saved state and the best weights (if kept)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(str(folder / "trainable.safetensors"))
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n])
    state = torch.load(folder / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    best = folder / "best.safetensors"
    return state, load_file(str(best)) if best.is_file() else None


def has_checkpoint(folder: Path | None) -> bool:
    return folder is not None and (Path(folder) / "state.pt").is_file()
