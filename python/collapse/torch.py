"""collapse.torch: stream a causal LM's final-norm hidden states into a collapse session.

    from collapse.torch import Collector
    with Collector(model, module="model.norm", num_classes=V) as col:   # or module=None: found by name
        for input_ids, attention_mask in loader:
            col(input_ids, attention_mask=attention_mask)              # runs model(input_ids, ...)
    rep = col.compute()

A forward hook on `module` (whose output is the hidden states [B, T, d] the classifier multiplies)
hands them to Session.ingest_sequences with the batch's input_ids and attention_mask: rows
X = hidden[:, :-1], labels Y = input_ids[:, 1:], kept where attention_mask[:, 1:] != 0, batch after
batch. Nothing is kept in Python between batches (the seed's CollapseCollector stored every hidden
state); the engine reads the hook's tensor in place (CPU, or CUDA on the tensor's current stream
with a session whose config has backend: cuda) before the forward pass goes on.
"""
import torch

import collapse

# Where common causal LMs keep the final norm (Hugging Face Llama/Mistral/Qwen, GPT-2, GPT-NeoX,
# OPT, llama2.c-style) and the classifier.
FINAL_NORM_NAMES = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
                    "norm", "ln_f", "final_norm")
CLASSIFIER_NAMES = ("lm_head", "output", "embed_out", "classifier")


def _submodule(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


class Collector:
    """Feeds a model's final-norm hidden states into a collapse Session, batch after batch.

    model:       a torch.nn.Module called as model(input_ids, **kwargs) (kwargs of __call__).
    module:      the final-norm module or its path in the model ("model.norm"); None: the first of
                 FINAL_NORM_NAMES that exists.
    session:     a collapse.Session to feed; else one is made from config and num_classes.
    config:      collapse.Config / dict / YAML path for the new session.
    num_classes: V; default the classifier's rows.
    classifier:  W [V, d] (a tensor), a module path whose .weight is W, False for none; None: the
                 first of CLASSIFIER_NAMES that exists. Set on the session (UNC3, NC3, NC4).
    pass_attention_mask: give attention_mask to the model too (Hugging Face models take it).
    """

    def __init__(self, model, module=None, session=None, config=None, num_classes=None, classifier=None,
                 pass_attention_mask=True):
        self.model = model
        self.module_name, self.module = self._find_module(model, module)
        weight = self._find_classifier(model, classifier)
        if session is None:
            if num_classes is None and weight is not None:
                num_classes = weight.shape[0]
            session = collapse.Session(config, num_classes=num_classes)
        self.session = session
        if weight is not None:
            self.session.set_classifier(weight.detach())
        self.pass_attention_mask = pass_attention_mask
        self._pending = None   # (input_ids, attention_mask) of the forward pass in progress
        self._fed = 0
        self.batches = 0
        self._handle = self.module.register_forward_hook(self._hook)

    @staticmethod
    def _find_module(model, module):
        if isinstance(module, torch.nn.Module):
            return type(module).__name__, module
        if isinstance(module, str):
            m = _submodule(model, module)
            if m is None:
                raise ValueError(f"Collector: the model has no module '{module}'")
            return module, m
        if module is not None:
            raise TypeError("Collector: module must be an nn.Module, a module path or None")
        for name in FINAL_NORM_NAMES:
            m = _submodule(model, name)
            if m is not None:
                return name, m
        raise ValueError("Collector: no final-norm module found (tried " + ", ".join(FINAL_NORM_NAMES) +
                         "); pass module='path.to.norm'")

    @staticmethod
    def _find_classifier(model, classifier):
        if classifier is False:
            return None
        if isinstance(classifier, torch.Tensor):
            return classifier
        names = (classifier,) if isinstance(classifier, str) else CLASSIFIER_NAMES
        for name in names:
            m = _submodule(model, name)
            w = getattr(m, "weight", None) if m is not None else None
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                return w
        if isinstance(classifier, str):
            raise ValueError(f"Collector: '{classifier}' is not a module with a 2-D weight")
        return None

    def _hook(self, mod, inputs, output):
        if self._pending is None:
            return None  # a forward pass outside the collector: not collected
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if self._fed:
            raise RuntimeError(f"Collector: module '{self.module_name}' ran twice in one forward pass; hook the "
                               "final norm, which runs once")
        input_ids, mask = self._pending
        self.session.ingest_sequences(hidden.detach(), input_ids, mask)
        self._fed += 1
        return None

    def feed(self, hidden, input_ids, attention_mask=None):
        """Hidden states the caller already has ([B, T, d]), without running the model."""
        self.session.ingest_sequences(hidden.detach() if isinstance(hidden, torch.Tensor) else hidden, input_ids,
                                      attention_mask)
        self.batches += 1

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        """Runs model(input_ids, [attention_mask=...], **kwargs) under torch.no_grad() and collects
        the batch. Returns the model's output."""
        if self._handle is None:
            raise RuntimeError("Collector: closed")
        if attention_mask is not None and self.pass_attention_mask:
            kwargs["attention_mask"] = attention_mask
        self._pending, self._fed = (input_ids, attention_mask), 0
        try:
            with torch.no_grad():
                out = self.model(input_ids, **kwargs)
        finally:
            self._pending = None
        if not self._fed:
            raise RuntimeError(f"Collector: module '{self.module_name}' did not run during the forward pass")
        self.batches += 1
        return out

    def snapshot(self):
        return self.session.snapshot()

    def compute(self):
        """Removes the hook and computes the report."""
        self.close()
        return self.session.compute()

    def close(self):
        """Removes the hook (the session stays)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
