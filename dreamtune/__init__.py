"""dreamtune: fine-tune and evaluate masked diffusion language models.

The public Python API is deliberately small:

    import dreamtune
    lm = dreamtune.load("Dream-org/Dream-v0-Base-7B")   # or a local directory
    out = dreamtune.generate(lm, input_ids, max_new_tokens=256, alg="entropy", steps=256)

Everything else is reached through the `dreamtune <verb>` command line.
"""

__version__ = "0.1.0"


def load(path_or_id, dtype=None, device=None, **kwargs):
    """Load a diffusion LM (Dream, LLaDA-style, or any HF Qwen2/Llama decoder). See dreamtune.models.load."""
    from dreamtune.models import load as _load

    return _load(path_or_id, dtype=dtype, device=device, **kwargs)


def generate(lm, input_ids, attention_mask=None, sampler=None, **kwargs):
    """Diffusion generation (Dream's algorithms, the fast sampler, LLaDA's). See dreamtune.engine.generate."""
    from dreamtune.engine import generate as _generate

    return _generate(lm, input_ids, attention_mask, sampler, **kwargs)


__all__ = ["load", "generate", "__version__"]
