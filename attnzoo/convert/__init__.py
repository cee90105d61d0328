"""Load the ImageNet checkpoints the attention modules' authors published into attnzoo models.

    import attnzoo
    from attnzoo.convert import load_checkpoint, load_official

    model = attnzoo.create_model("resnet50", attention="cbam", attention_kwargs={"bn_momentum": 0.01})
    report = load_official(model, load_checkpoint("resnet50_cbam.pth.tar"), "jongchan")

Sources (``official_sources()``; one file each, with the official names and layouts):
``"jongchan"`` (CBAM, BAM), ``"ecanet"`` (ECA), ``"triplet"`` (triplet attention),
``"timm"`` (plain, SE and ECA ResNets with the plain stem). ``load_official`` refuses a
checkpoint that does not fit the model with a ``ValueError`` that names the key, shape or
setting and the ``create_model`` call that builds the matching model;
``create_official_model`` builds that model itself. See docs/convert.md.
"""

from . import ecanet, jongchan, timm, triplet  # noqa: F401  (register the sources)
from .checkpoint import load_checkpoint, unwrap_state_dict
from .core import (
    ConvertReport,
    create_official_model,
    load_official,
    official_sources,
    parse_backbone,
)
from .ecanet import set_eca_kernel_sizes

__all__ = [
    "ConvertReport",
    "create_official_model",
    "load_checkpoint",
    "load_official",
    "official_sources",
    "parse_backbone",
    "set_eca_kernel_sizes",
    "unwrap_state_dict",
]
