"""Every MoE family expertd packs and offloads, and how each keeps and computes its experts.

One table (`FAMILIES`), read three ways: `expertd pack --from-hf` checks a model directory's
config.json and checkpoint against it before writing anything (`check_config`,
`check_checkpoint`); the store's manifest records the resulting `ExpertLayout`; and
`expertd.client.hf.offload` checks the model and the store against the same layout (the hello
reply carries it). Part of the wire contract because both sides read it; pure: no torch, no
transformers (config.json is a dict here).

Shape names in the table: ``F`` expert FFN size, ``D`` hidden size, ``2F`` gate and up together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

#: How a checkpoint names its routed experts (`expertd.daemon.store.checkpoint` finds them), and the
#: store tensors each naming gives: (name, shape) per expert, gate before up before down.
NAMING_TENSORS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "mixtral": (("w1", ("F", "D")), ("w3", ("F", "D")), ("w2", ("D", "F"))),
    "experts": (("gate_proj", ("F", "D")), ("up_proj", ("F", "D")), ("down_proj", ("D", "F"))),
    "granite": (("input_linear", ("2F", "D")), ("output_linear", ("D", "F"))),
    "llama4": (("gate_up_proj", ("D", "2F")), ("down_proj", ("F", "D"))),
    "gpt_oss": (
        ("gate_up_proj", ("D", "2F")),
        ("gate_up_proj_bias", ("2F",)),
        ("down_proj", ("F", "D")),
        ("down_proj_bias", ("D",)),
    ),
    "dbrx": (("w1", ("F", "D")), ("v1", ("F", "D")), ("w2", ("F", "D"))),
}
#: The model's expert parameters (transformers 5) each naming's store tensors make, in order.
NAMING_WEIGHTS: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
    "experts": {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)},
    "granite": {"gate_up_proj": ("input_linear",), "down_proj": ("output_linear",)},
    "llama4": {"gate_up_proj": ("gate_up_proj",), "down_proj": ("down_proj",)},
    "gpt_oss": {
        "gate_up_proj": ("gate_up_proj",),
        "gate_up_proj_bias": ("gate_up_proj_bias",),
        "down_proj": ("down_proj",),
        "down_proj_bias": ("down_proj_bias",),
    },
    "dbrx": {"mlp.w1": ("w1",), "mlp.v1": ("v1",), "mlp.w2": ("w2",)},
}


#: Where configs may keep the routed experts per layer, after the family's own key (transformers 5
#: writes num_local_experts for most, whatever the original config called it).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
#: Namings whose gate_up and down are stored [in, out] (the model computes x @ W).
TRANSPOSED_NAMINGS = ("llama4", "gpt_oss")


class FamilyError(ValueError):
    """A model whose MoE layout expertd does not support; the message names the family and what differs."""


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """How one routed expert is stored and computed: what the manifest records, pack and offload check."""

    family: str  # the config's model_type
    weights: dict[str, tuple[str, ...]]  # model parameter -> the store tensors it is made of (concatenated)
    transposed: bool = False  # weights are [in, out] (x @ W), not nn.Linear's [out, in]
    bias: bool = False  # gate_up and down have biases
    gate_up: str = "concatenated"  # gate rows then up rows; "interleaved": alternating (GPT-OSS); "split"
    activation: str = "silu"  # what the family applies to gate (descriptive: the model's own code runs it)
    router: str = "logits, weights, experts"  # what the router returns
    experts_call: str = "routed"  # "routed": experts(hidden, index, weights); "dense": every expert (Llama-4)

    def to_json(self) -> dict[str, Any]:
        obj = dataclasses.asdict(self)
        obj["weights"] = {k: list(v) for k, v in self.weights.items()}
        return obj

    @classmethod
    def from_json(cls, obj: Any, where: str = "expert_layout") -> ExpertLayout:
        """Parse a manifest's ``expert_layout``; `ValueError` naming the bad field."""
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(obj) - set(fields)
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        weights = obj.get("weights")
        if (
            not isinstance(weights, dict)
            or not weights
            or not all(
                isinstance(k, str) and isinstance(v, list) and v and all(isinstance(n, str) for n in v)
                for k, v in weights.items()
            )
        ):
            raise ValueError(f"{where}.weights: expected parameter name -> list of tensor names")
        values: dict[str, Any] = {"weights": {k: tuple(v) for k, v in weights.items()}}
        if "family" not in obj:
            raise ValueError(f"{where}: missing field 'family'")
        for name in ("family", "gate_up", "activation", "router", "experts_call"):
            value = obj.get(name, fields[name].default)
            if not isinstance(value, str):
                raise ValueError(f"{where}.{name}: expected a string, got {value!r:.40}")
            values[name] = value
        for name in ("transposed", "bias"):
            value = obj.get(name, fields[name].default)
            if not isinstance(value, bool):
                raise ValueError(f"{where}.{name}: expected true or false, got {value!r:.40}")
            values[name] = value
        return cls(**values)

    def differences(self, other: ExpertLayout) -> list[str]:
        """What ``other`` has that this layout does not, field by field ('transposed: False != True')."""
        mine, theirs = self.to_json(), other.to_json()
        return [f"{k}: {mine[k]} != {theirs[k]}" for k in mine if mine[k] != theirs[k]]


@dataclasses.dataclass(frozen=True)
class Family:
    """One transformers MoE family: its config keys, its sparse layers' rule, its expert layout."""

    title: str  # as the README lists it
    model_types: tuple[str, ...]  # config.json model_type values
    naming: str  # how its checkpoints name the experts (a `NAMING_TENSORS` key)
    expert_keys: tuple[str, ...]  # config keys of the routed experts per layer (first present wins)
    ffn_key: str  # config key of the expert FFN size F
    moe_layers: Callable[[dict[str, Any], int], list[int]]  # (config, num_layers) -> sparse decoder layers
    hidden_key: str = "hidden_size"
    sub_config: str = ""  # where the text model's keys are ("text_config" for Llama-4 multimodal)
    gate_up: str = "concatenated"
    activation_key: str = "hidden_act"
    router: str = "logits, weights, experts"
    experts_call: str = "routed"

    def layout(self, config: dict[str, Any]) -> ExpertLayout:
        """The expert layout a model of this family with ``config`` has."""
        tensors = NAMING_TENSORS[self.naming]
        activation = _dig(text_config(config), self.activation_key)
        if self.naming == "gpt_oss":
            text = text_config(config)
            activation = (
                f"clamped swiglu (alpha {text.get('swiglu_alpha')}, limit {text.get('swiglu_limit')})"
            )
        return ExpertLayout(
            family=self.model_types[0],
            weights=NAMING_WEIGHTS[self.naming],
            transposed=self.naming in TRANSPOSED_NAMINGS,
            bias=any(name.endswith("_bias") for name, _ in tensors),
            gate_up=self.gate_up,
            activation=str(activation if activation is not None else "silu"),
            router=self.router,
            experts_call=self.experts_call,
        )


def _dig(config: dict[str, Any], key: str) -> Any:
    """``config["a"]["b"]`` for key "a.b" (None where missing)."""
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of the text model (a multimodal config nests them under ``text_config``)."""
    family = FAMILY_OF.get(str(config.get("model_type")))
    if family is not None and family.sub_config and isinstance(config.get(family.sub_config), dict):
        return config[family.sub_config]
    return config


def _all(config: dict[str, Any], n: int) -> list[int]:
    return list(range(n))


def _qwen(config: dict[str, Any], n: int) -> list[int]:  # sparse unless listed dense or off-step
    dense = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step", 1) or 1)
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def _first_dense(config: dict[str, Any], n: int) -> list[int]:  # DeepSeek, GLM-4.5, dots.llm1
    first = int(config.get("first_k_dense_replace", 0) or 0)
    every = int(config.get("moe_layer_freq", 1) or 1)
    return [i for i in range(n) if i >= first and i % every == 0]


def _jamba(config: dict[str, Any], n: int) -> list[int]:
    period, offset = int(config.get("expert_layer_period", 1)), int(config.get("expert_layer_offset", 0))
    return [i for i in range(n) if i % period == offset]


def _ernie(config: dict[str, Any], n: int) -> list[int]:
    start, end = int(config.get("moe_layer_start_index", 0)), int(config.get("moe_layer_end_index", -1))
    end = n - 1 if end < 0 else end
    every = int(config.get("moe_layer_interval", 1) or 1)
    return [i for i in range(n) if (i + 1) % every == 0 and start <= i <= end]


def _llama4(config: dict[str, Any], n: int) -> list[int]:
    listed = config.get("moe_layers")
    if isinstance(listed, list):
        return sorted(int(i) for i in listed)
    step = int(config.get("interleave_moe_layer_step", 1) or 1)
    return list(range(step - 1, n, step))


_F = Family
_FFN, _MOE_FFN = "intermediate_size", "moe_intermediate_size"
_LOCAL, _NUM, _ROUTED = ("num_local_experts",), ("num_experts",), ("n_routed_experts",)
FAMILIES: tuple[Family, ...] = (
    _F("Mixtral", ("mixtral",), "mixtral", _LOCAL, _FFN, _all),
    _F("Qwen2-MoE", ("qwen2_moe",), "experts", _NUM, _MOE_FFN, _qwen),
    _F("Qwen3-MoE", ("qwen3_moe",), "experts", _NUM, _MOE_FFN, _qwen),
    _F("Qwen3-Next", ("qwen3_next",), "experts", _NUM, _MOE_FFN, _qwen),
    _F("OLMoE", ("olmoe",), "experts", _NUM, _FFN, _all),
    _F("DeepSeek-V2", ("deepseek_v2",), "experts", _ROUTED, _MOE_FFN, _first_dense),
    _F("DeepSeek-V3 (Kimi K2)", ("deepseek_v3",), "experts", _ROUTED, _MOE_FFN, _first_dense),
    _F("GLM-4.5", ("glm4_moe",), "experts", _ROUTED, _MOE_FFN, _first_dense),
    _F("dots.llm1", ("dots1",), "experts", _ROUTED, _MOE_FFN, _first_dense),
    _F("PhiMoE", ("phimoe",), "mixtral", _LOCAL, _FFN, _all),
    _F("Jamba", ("jamba",), "experts", _NUM, _FFN, _jamba),
    _F("ERNIE-4.5-MoE", ("ernie4_5_moe",), "experts", ("moe_num_experts",), _MOE_FFN, _ernie),
    _F("Hunyuan-MoE", ("hunyuan_v1_moe",), "experts", _NUM, _MOE_FFN, _all),
    _F("MiniMax", ("minimax",), "mixtral", _LOCAL, _FFN, _all),
    _F("MiniMax-M2", ("minimax_m2",), "mixtral", _LOCAL, _FFN, _all),
    _F("GPT-OSS", ("gpt_oss",), "gpt_oss", _LOCAL, _FFN, _all, gate_up="interleaved"),
    _F("Llama-4", ("llama4_text", "llama4"), "llama4", _LOCAL, _FFN, _llama4, sub_config="text_config",
       router="scores, logits", experts_call="dense"),
    _F("Granite-MoE", ("granitemoe",), "granite", _LOCAL, _FFN, _all),
    _F("Granite-4 hybrid", ("granitemoehybrid",), "granite", _LOCAL, _FFN, _all),
    _F("DBRX", ("dbrx",), "dbrx", ("ffn_config.moe_num_experts",), "ffn_config.ffn_hidden_size", _all,
       hidden_key="d_model", gate_up="split", activation_key="ffn_config.ffn_act_fn.name", router="logits"),
)  # fmt: skip
FAMILY_OF: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def family_of(config: dict[str, Any]) -> Family:
    """``config``'s family; `FamilyError` naming the model type if expertd does not support it."""
    kind = config.get("model_type")
    family = FAMILY_OF.get(str(kind))
    if family is None:
        raise FamilyError(
            f"model type {kind!r} is not a MoE family expertd supports "
            f"(supported: {', '.join(t for f in FAMILIES for t in f.model_types)})"
        )
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        raise FamilyError(
            f"{kind}: its experts are quantized ({quant.get('quant_method', 'quantization_config')}); "
            f"expertd packs and serves bf16/fp16/fp32 experts: dequantize the checkpoint first"
        )
    return family


@dataclasses.dataclass(frozen=True)
class ConfigExperts:
    """What a config says about its routed experts."""

    family: Family
    layers: list[int]  # sparse decoder layers
    num_experts: int
    ffn: int  # F
    hidden: int  # D
    layout: ExpertLayout

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each store tensor's per-expert shape."""
        size = {"F": self.ffn, "2F": 2 * self.ffn, "D": self.hidden}
        return {name: tuple(size[d] for d in dims) for name, dims in NAMING_TENSORS[self.family.naming]}


def check_config(config: dict[str, Any]) -> ConfigExperts:
    """``config``'s family and routed experts; `FamilyError` naming what is unsupported or missing."""
    family = family_of(config)
    text = text_config(config)
    kind = config.get("model_type")

    def number(key: str) -> int:
        value = _dig(text, key)
        if isinstance(value, list) and value and len(set(value)) == 1:  # per-layer list, all equal
            value = value[0]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FamilyError(f"{kind}: config.json {key} is {value!r:.60}, expected a positive int")
        return value

    keys = (*family.expert_keys, *EXPERT_COUNT_KEYS)
    experts_key = next((k for k in keys if _dig(text, k) is not None), family.expert_keys[0])
    num_layers = number("n_layers" if family.hidden_key == "d_model" else "num_hidden_layers")
    layers = family.moe_layers(text, num_layers)
    if not layers:
        raise FamilyError(f"{kind}: config.json describes no sparse MoE layer")
    return ConfigExperts(
        family=family,
        layers=layers,
        num_experts=number(experts_key),
        ffn=number(family.ffn_key),
        hidden=number(family.hidden_key),
        layout=family.layout(config),
    )


def check_checkpoint(
    experts: ConfigExperts,
    naming: str,
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    layers: list[int],
    num_experts: int,
) -> None:
    """The checkpoint's experts (naming, tensor name -> (dtype, per-expert shape), layers, count) against
    the config's; `FamilyError` naming the first difference."""
    kind = experts.layout.family
    want = experts.tensor_shapes()
    if set(tensors) != set(want):
        raise FamilyError(
            f"{kind}: {experts.family.title} experts are {', '.join(want)} ({experts.family.naming} naming); "
            f"the checkpoint has {', '.join(tensors)} ({naming} naming)"
        )
    if layers != experts.layers:
        raise FamilyError(
            f"{kind}: config.json has MoE layers {experts.layers}, "
            f"the checkpoint has experts in layers {layers}"
        )
    if num_experts != experts.num_experts:
        raise FamilyError(
            f"{kind}: config.json says {experts.num_experts} routed experts per layer, "
            f"the checkpoint has {num_experts}"
        )
    for name, (_, shape) in tensors.items():
        if shape != want[name]:
            raise FamilyError(
                f"{kind}: expert tensor {name} is {list(shape)} in the checkpoint; config.json "
                f"(F={experts.ffn}, D={experts.hidden}) makes it {list(want[name])}"
            )


def readme_line(covered: list[str]) -> str:
    """The README's sentence listing the supported families: those of `FAMILIES` in ``covered``
    (model types that tests/test_hf.py runs), in table order."""
    titles = [f.title for f in FAMILIES if f.model_types[0] in covered]
    return f"Supported families ({len(titles)}): {', '.join(titles)}."
