"""effattn: memory-efficient attention and sequence mixing behind one API."""

from effattn.exact import (
    BlockMask,
    attention,
    create_block_mask,
    decode_attention,
    explain,
    merge_attention_states,
)

__version__ = "0.1.0"
__all__ = ["BlockMask", "attention", "create_block_mask", "decode_attention", "explain", "merge_attention_states"]
