"""Speed plumbing of the networks: ``torch.compile`` made once per network, with an eager fallback."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable[..., Tensor]] = weakref.WeakKeyDictionary()


def compiled(net: nn.Module) -> Callable[..., Tensor]:
    """``torch.compile(net)``, made once per network (kept outside the module, so its ``state_dict`` and copies of it
    are unchanged); where compilation is unsupported or fails, one log line and ``net`` itself (eager) from then on.
    """
    if net not in _COMPILED:
        if not torch._dynamo.is_dynamo_supported():
            log.warning("torch.compile is not supported on this Python/platform: the network runs eagerly")
            _COMPILED[net] = net
        else:
            _COMPILED[net] = _EagerFallback(net, torch.compile(net))
    return _COMPILED[net]


class _EagerFallback:
    """Calls the compiled network; if compiling it fails (no C++ compiler, an unsupported op), logs why once and
    calls the eager network from then on."""

    def __init__(self, net: nn.Module, compiled_net: Callable[..., Tensor]) -> None:
        self.net, self.compiled_net = net, compiled_net

    def __call__(self, *args: Any) -> Tensor:
        if self.compiled_net is not None:
            try:
                return self.compiled_net(*args)
            except Exception as e:  # torch._dynamo / inductor errors have no common public base class
                log.warning(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}): the network "
                            "runs eagerly (set model.compile=false to skip the attempt)")
                self.compiled_net = None
        return self.net(*args)
