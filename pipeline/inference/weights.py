"""Loading a network's weights for inference and evaluation, with errors that name the file.

MONAI's CheckpointLoader also loads with ``weights_only=True``, but a checkpoint of another bundle
or of other network settings ends in torch's list of every mismatching tensor, and a full training
state (``latest.pt``) is refused. Here the error names the file and the first differing parameter
with both shapes, and ``latest.pt`` gives its network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from ignite.engine import Engine, Events

from pipeline.io.checkpoint import load_network_weights


class LoadWeights:
    """ignite handler: load ``checkpoint`` into ``network`` when the engine starts."""

    def __init__(
        self, checkpoint: str | Path, network: torch.nn.Module, map_location: str | torch.device = "cpu"
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.network = network
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, _: Engine | None = None) -> None:
        load_network_weights(self.network, self.checkpoint, self.map_location)
