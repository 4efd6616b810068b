"""trifuse engine: transformer models built on trifuse's fused kernels.

``engine.from_pretrained(source)`` loads a Hugging Face checkpoint (a local
directory or an in-memory ``transformers`` model) into trifuse's own graph.
"""

if __name__ != "trifuse.engine":  # the source folder imported by its bare name
    from trifuse.sourcetree import stand_aside

    stand_aside(__name__, __file__)
else:
    # Importing the engine loads no kernel (see trifuse/cli.py): the model modules import them.
    from .family import Family
    from .loading import read_checkpoint
    from .outputs import EncoderOutput, LogitsOutput, ModelOutput, QuestionAnsweringOutput
    from .packing import Packed, use_packing
    from .pooling import mean_pool
    from .registry import families, family_of, from_pretrained, resolve_dtype, supported_model_types

    __all__ = ["Packed", "use_packing", "from_pretrained", "read_checkpoint", "resolve_dtype", "supported_model_types", "mean_pool",
               "ModelOutput", "EncoderOutput", "LogitsOutput", "QuestionAnsweringOutput", "Family", "families",
               "family_of"]
