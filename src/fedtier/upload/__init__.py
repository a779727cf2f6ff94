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

__all__ = ["STAGES", "Chain", "Stage", "UploadContext", "build_chain", "clip_norm", "named_chain"]
