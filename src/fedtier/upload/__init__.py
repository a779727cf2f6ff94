"""Update transforms between a client and its edge: attacks, clipping, noise, codecs."""

from fedtier.upload.chain import (
    STAGES,
    Chain,
    Stage,
    UploadContext,
    build_chain,
    clip_norm,
    named_chain,
)
from fedtier.upload.compress import CODEC_STAGES

STAGES.update(CODEC_STAGES)

__all__ = ["STAGES", "Chain", "Stage", "UploadContext", "build_chain", "clip_norm", "named_chain"]
