"""The SPT model: a frozen causal LM, a bank of K soft prompts (K, n, d) and a retriever.

All K x B (prompt, example) pairs run through the LM as one batch of K*B rows (in chunks if asked),
padded only to the batch's longest example, and the LM head runs only at response positions.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, losses
from .config import SPTConfig
from .format import IGNORE_INDEX
from .retriever import Retriever, spherical_kmeans

log = logging.getLogger(__name__)


@dataclass
class Spliced:
    inputs_embeds: torch.Tensor  # (R, n + T, d)
    attention_mask: torch.Tensor  # (R, n + T)
    position_ids: torch.Tensor  # (R, n + T)
    labels: torch.Tensor | None  # (R, n + T), IGNORE_INDEX on prompt and padding


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (0 at each row's first real token), so padding on either side
    never shifts a row's positions."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def splice(prompt_embeds: torch.Tensor, token_embeds: torch.Tensor, attention_mask: torch.Tensor,
           labels: torch.Tensor | None = None) -> Spliced:
    """Put each row's soft prompt right before its first real token.

    prompt_embeds (R, n, d), token_embeds (R, T, d), attention_mask (R, T), labels (R, T).
    Right-padded rows become (prompt, text, pad); left-padded rows become (pad, prompt, text), the
    layout generation needs. The prompt's mask is 1 and its labels are IGNORE_INDEX; position ids
    count real tokens only, so padding never shifts positions.
    """
    R, n, _ = prompt_embeds.shape
    T = token_embeds.shape[1]
    lead = (attention_mask.cumsum(1) == 0).sum(1, keepdim=True)  # (R, 1) leading pads
    j = torch.arange(n + T, device=attention_mask.device).unsqueeze(0)  # (1, n + T)
    # Index into the concatenation [prompt (n); tokens (T)] for every output position.
    src = torch.where(j < lead, n + j, torch.where(j < lead + n, j - lead, j))  # (R, n + T)
    embeds = torch.cat([prompt_embeds.to(token_embeds.dtype), token_embeds], 1)
    embeds = embeds.gather(1, src.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    mask = torch.cat([attention_mask.new_ones(R, n), attention_mask], 1).gather(1, src)
    position_ids = mask_positions(mask)
    spliced_labels = None
    if labels is not None:
        spliced_labels = torch.cat([labels.new_full((R, n), IGNORE_INDEX), labels], 1).gather(1, src)
    return Spliced(embeds, mask, position_ids, spliced_labels)


def causal_suffices(attention_mask: torch.Tensor) -> bool:
    """True when no row has padding before a real token (every row unpadded or right-padded, as training
    batches are). Then causal attention alone keeps every real token from seeing padding, and positions count
    from 0 either way, so the LM can run without a mask: SDPA takes its ``is_causal`` path (flash attention
    skips the masked half of the score blocks instead of computing and then masking them). Padding
    positions' outputs change, but no loss reads them and no real position attends to them."""
    m = attention_mask.bool()
    return bool(m[:, 0].all() and (m[:, :-1] | ~m[:, 1:]).all())


def response_logits(lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None, labels: torch.Tensor, pass_positions: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the LM body, then its head only where a label follows: logits (N, V), targets (N,).

    Rows are flattened in row-major order (row 0's response tokens first). Computing the
    vocabulary projection at N response positions instead of every position is most of the saving
    over a plain forward for short responses."""
    kwargs = {"position_ids": position_ids} if pass_positions and position_ids is not None else {}
    mask = None if causal_suffices(attention_mask) else attention_mask
    hidden = lm.base_model(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs,
                           **no_cache(lm.base_model)).last_hidden_state  # (R, T, d)
    targets = labels[:, 1:]
    sel = targets != IGNORE_INDEX  # predict token t + 1 from position t
    head = lm.get_output_embeddings()
    # The head runs in fp32 even under autocast: SPT compares per-prompt losses that differ by ~0.01
    # nats, and bf16 logits add noise of that size (the best prompt by bf16 and fp32 losses disagreed
    # on 12% of examples on persona-gpt-mini). It is one matmul at response positions only.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        logits = F.linear(hidden[:, :-1][sel].float(), head.weight.float(), bias)  # (N, V)
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits, targets[sel]


def response_token_example(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For labels (B, T): the example index of each response token in row-major order (M,), and the
    number of response tokens per example (B,), matching the order ``response_logits`` returns."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    return torch.repeat_interleave(torch.arange(labels.shape[0], device=labels.device), counts), counts


# --- train.chunk_size: auto -------------------------------------------------------------------------

AUTO_CHUNK_SAFETY = 0.5  # of the free memory, the share ``auto`` plans to fill; the rest is left to everything else


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory this process may still allocate on ``device``, in bytes; None when it cannot be read.

    cuda: free device memory plus what PyTorch's caching allocator holds unused. cpu: MemAvailable from
    /proc/meminfo, capped by the cgroup's memory limit minus its usage where one is set (containers)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    if match is None:
        return None
    available = int(match.group(1)) * 1024
    cgroups = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2, then v1
               ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))
    for limit, usage in cgroups:
        try:
            cap, used = Path(limit).read_text().strip(), Path(usage).read_text().strip()
        except OSError:
            continue
        if cap.isdigit() and used.isdigit() and int(cap) < 2**60:
            available = min(available, max(0, int(cap) - int(used)))
        break
    return available


def row_memory(lm: nn.Module, tokens: int, responses: int, training: bool) -> tuple[int, int]:
    """Rough activation memory of one LM row of ``tokens`` positions with ``responses`` of them scored, in bytes:
    (kept until the backward whatever the chunk, needed only while the row's chunk runs its forward).

    From the config's width d, layers L, heads H, FFN width f and vocabulary V, at the LM's parameter width
    (4 bytes for fp32 weights, which also covers bf16 autocast's fp32 layer norms and residuals):
    a layer keeps ~12d + 3f values per token for its backward (+ H*T per token for eager attention's
    probabilities), its forward briefly holds ~6d + 2f per token plus H*T^2 attention scores (a math-SDPA
    fallback), and the fp32 head holds logits, log-probabilities and their gradient (3V per scored position).
    Meant to err on the large side (measured: ~1.5x an OPT-125M step's real peak)."""
    c = lm.config
    d = int(getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0) or 768)
    L = int(getattr(c, "num_hidden_layers", 0) or getattr(c, "n_layer", 0) or 12)
    H = int(getattr(c, "num_attention_heads", 0) or getattr(c, "n_head", 0) or 12)
    f = int(getattr(c, "intermediate_size", 0) or getattr(c, "ffn_dim", 0) or getattr(c, "n_inner", 0) or 4 * d)
    V = int(getattr(c, "vocab_size", 0) or 50_000)
    width = max(getattr(lm, "dtype", torch.float32).itemsize, 2)
    T = tokens
    eager = getattr(c, "_attn_implementation", "sdpa") == "eager"
    layer_kept = (12 * d + 3 * f + (H * T if eager else 0)) * T * width
    transient = ((6 * d + 2 * f) * T + H * T * T) * width + 3 * V * responses * 4
    if not training:
        return V * responses * 4, transient  # only the returned logits outlive the forward
    if activation_checkpointing(lm):  # layers keep their inputs; each recomputes its activations in the backward
        return L * d * T * width + 2 * V * responses * 4, transient + layer_kept
    return L * layer_kept + 2 * V * responses * 4, transient


def auto_chunk_rows(lm: nn.Module, rows: int, tokens: int, responses_per_row: int, device: torch.device,
                    training: bool) -> int:
    """Rows per LM forward for ``train.chunk_size: auto``: as many as fit in AUTO_CHUNK_SAFETY of the free
    memory after what every row keeps for the backward anyway; at least 1; all ``rows`` when memory cannot be
    read. Chunking never changes results, only the peak of one forward."""
    free = free_memory_bytes(device)
    if free is None:
        log.debug("train.chunk_size auto: free memory on %s unknown; all %d rows in one forward", device, rows)
        return rows
    kept, transient = row_memory(lm, tokens, responses_per_row, training)
    budget = AUTO_CHUNK_SAFETY * free - kept * rows
    chunk = int(min(rows, max(1, budget // max(transient, 1))))
    log.debug("train.chunk_size auto: %d of %d rows per forward (%d tokens, %.0f MiB free, ~%.1f MiB kept and "
              "~%.1f MiB transient per row)", chunk, rows, tokens, free / 2**20, kept / 2**20, transient / 2**20)
    if budget <= 0:
        log.debug("train.chunk_size auto: what all %d rows keep for the backward (~%.0f MiB) exceeds the budget; "
                  "chunking cannot lower it: enable model.gradient_checkpointing or lower train.batch_size",
                  rows, kept * rows / 2**20)
    return chunk


@functools.cache
def _takes_use_cache(forward_owner: type) -> bool:
    return "use_cache" in inspect.signature(forward_owner.forward).parameters


def no_cache(body: nn.Module) -> dict:
    """``{"use_cache": False}`` for a body that takes it. A training or scoring forward never reuses a KV cache,
    but HF bodies build one by default (config.use_cache) and copy every layer's keys and values into it: on
    OPT-125M that was ~3% of a bf16 training step and 0.4 GB at 32 rows x 179 tokens."""
    return {"use_cache": False} if _takes_use_cache(type(body)) else {}


def activation_checkpointing(lm: nn.Module) -> bool:
    flag = getattr(lm, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(lm, "is_gradient_checkpointing", False))


def takes_position_ids(lm: nn.Module) -> bool:
    return "position_ids" in inspect.signature(lm.base_model.forward).parameters


def init_prompts(embeddings: torch.Tensor, K: int, n: int, mode: str = "vocab", text_ids: list[int] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial prompt bank (K, n, d) in fp32.

    vocab: rows of the embedding table sampled at random (each prompt its own tokens);
    random: Gaussian with the table's std; text: the embeddings of ``text_ids`` (cycled to n tokens)
    plus small noise per prompt, so the K prompts start close but distinguishable."""
    table = embeddings.detach().float()
    V, d = table.shape
    if mode == "vocab":
        ids = torch.randint(0, V, (K, n), generator=generator)
        return table[ids].clone()
    std = table.std().item()
    if mode == "random":
        return torch.randn(K, n, d, generator=generator) * std
    if mode == "text":
        if not text_ids:
            raise ValueError("prompt_init 'text' needs a non-empty prompt_init_text")
        ids = torch.tensor([text_ids[i % len(text_ids)] for i in range(n)])
        return table[ids].unsqueeze(0).repeat(K, 1, 1) + 0.01 * std * torch.randn(K, n, d, generator=generator)
    raise ValueError(f"unknown prompt init {mode!r}")


BALANCE_MOMENTUM = 0.9  # the balance loss looks at the routing of ~10 recent batches, not one


@dataclass
class PairOutput:
    S: torch.Tensor  # (K, B) retriever scores
    logits: torch.Tensor  # (K, M, V) response-position logits
    targets: torch.Tensor  # (M,) response tokens (the same under every prompt)
    nll: torch.Tensor  # (K, M) per-token NLL
    token_example: torch.Tensor  # (M,) example index of each response token
    L: torch.Tensor  # (K, B) mean NLL of each example's response under each prompt
    features: torch.Tensor  # (B, d) the retriever's pooled, centred query features


class SPTModel(nn.Module):
    """Frozen LM + trainable prompts + retriever. ``trainable_state_dict`` is what a checkpoint holds."""

    def __init__(self, lm: nn.Module, cfg: SPTConfig, text_ids: list[int] | None = None, seed: int = 0):
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)
        self.cfg = cfg
        table = lm.get_input_embeddings().weight
        g = torch.Generator().manual_seed(seed)
        self.prompts = nn.Parameter(init_prompts(table, cfg.K, cfg.num_virtual_tokens, cfg.prompt_init, text_ids, g))
        self.retriever = Retriever(table.shape[1], cfg.K, cfg.retriever, cfg.softplus_beta, cfg.softplus_threshold,
                                   cfg.retriever_layers, center=bool(cfg.center_features),
                                   own_keys=cfg.keys == "kmeans")
        self._takes_positions = takes_position_ids(lm)
        # average routing over recent training batches, for the load-balance loss (not saved)
        self.register_buffer("route_avg", torch.full((cfg.K,), 1.0 / cfg.K), persistent=False)
        self.chunk_size: int | str | None = None  # train.chunk_size: rows per LM forward, None (all) or "auto"
        # (features (B, d), target q (K, B)) of recent training batches for the selection loss (not saved)
        self._replay: collections.deque = collections.deque(maxlen=max(1, cfg.sel_replay))

    def routing_state(self) -> dict:
        """Training-time routing memory (average routing, replayed batches) for an exact resume."""
        return {"route_avg": self.route_avg.detach().cpu().clone(),
                "replay": [(f.cpu(), q.cpu()) for f, q in self._replay]}

    def load_routing_state(self, state: dict) -> None:
        device = self.route_avg.device
        self.route_avg.copy_(state["route_avg"].to(device))
        self._replay.clear()
        self._replay.extend((f.to(device), q.to(device)) for f, q in state["replay"])

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen LM stays in eval mode (no dropout), except under activation checkpointing, which
        # HF applies only in train mode (SPTMethod has zeroed its dropout for that case).
        self.lm.train(mode and activation_checkpointing(self.lm))
        return self

    @property
    def K(self) -> int:
        return self.prompts.shape[0]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    def query(self, input_ids: torch.Tensor, query_mask: torch.Tensor, token_embeds: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the retriever pools, (B, T, d) and its mask (B, T), for ``spt.query``:

        - "embeddings" (the paper): the input embeddings of the inference input (persona + context);
        - "lm_hidden": the frozen LM's last hidden state at the last token of the inference input (no
          prompt), i.e. what the LM expects to say next. One extra forward without gradient (B rows, no
          LM head); padding on either side."""
        if self.cfg.query == "embeddings":
            return (self.embed(input_ids) if token_embeds is None else token_embeds), query_mask
        with torch.no_grad():
            kwargs = {"position_ids": mask_positions(query_mask)} if self._takes_positions else {}
            mask = None if causal_suffices(query_mask) else query_mask
            hidden = self.lm.base_model(input_ids=input_ids, attention_mask=mask, **kwargs,
                                        **no_cache(self.lm.base_model)).last_hidden_state
        T = query_mask.shape[1]
        last = T - 1 - query_mask.flip(1).argmax(1)  # (B,) index of the last query token
        return hidden.detach(), F.one_hot(last, T).to(query_mask.dtype)

    def scores(self, token_embeds: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """S (K, B) from the inference-input tokens (query_mask marks persona + context only)."""
        return self.retriever(self.prompts, token_embeds, query_mask)

    @torch.no_grad()
    def init_routing(self, token_embeds: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 0) -> torch.Tensor | None:
        """Set the retriever's centre c and k-means keys from training batches [(embeds (B, T, d), query mask)].

        Returns the k-means cluster of each training example (None without k-means keys)."""
        r = self.retriever
        x = torch.cat([r.features(e, m, centred=False) for e, m in token_embeds])  # (N, d)
        if r.center is not None:
            r.center.copy_(x.mean(0))
            x = x - r.center
        if r.keys is None:
            return None
        centroids, assign = spherical_kmeans(x, self.K, generator=torch.Generator().manual_seed(seed))
        r.keys.copy_(centroids * x.norm(dim=-1).mean())  # at the features' scale, so W's updates act alike
        return assign

    def select(self, S: torch.Tensor, noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """k* (B,) = argmax_k S[k] (+ optional Gaussian selection noise)."""
        if noise > 0:
            S = S + noise * torch.randn(S.shape, generator=generator).to(S.device)
        return S.argmax(0)

    # --- the LM on response positions only ----------------------------------------------------

    def _response_logits(self, prompt_rows: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, V) and targets (N,) at the response positions of R rows, in row-major order."""
        sp = splice(prompt_rows, embeds, mask, labels)
        return response_logits(self.lm, sp.inputs_embeds, sp.attention_mask, sp.position_ids, sp.labels,
                               self._takes_positions)

    def pair_logits(self, prompt_idx: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor, token_embeds: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Response logits for rows (prompt_idx[r], example r % B): one LM batch of R rows, chunked.

        prompt_idx (R,), the B examples repeated R / B times. Returns logits (N, V), targets (N,)."""
        B = input_ids.shape[0]
        E = self.embed(input_ids) if token_embeds is None else token_embeds
        reps = prompt_idx.shape[0] // B
        rows = self.prompts[prompt_idx]  # (R, n, d)
        E, mask, labels = (x.repeat(reps, *[1] * (x.dim() - 1)) for x in (E, attention_mask, labels))
        step = self.rows_per_forward(rows.shape[0], mask.shape[1] + rows.shape[1], labels)
        try:
            outs = [self._response_logits(rows[i:i + step], E[i:i + step], mask[i:i + step], labels[i:i + step])
                    for i in range(0, rows.shape[0], step)]
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(
                f"out of memory in the LM forward of {step} (prompt, example) rows of {mask.shape[1]} tokens "
                f"(train.chunk_size={self.chunk_size!r}): lower train.chunk_size (rows per forward, e.g. "
                f"--train.chunk_size={max(1, step // 2)}), or train.batch_size, or enable "
                f"model.gradient_checkpointing. {e}") from e
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def rows_per_forward(self, rows: int, tokens: int, labels: torch.Tensor) -> int:
        """The chunk for R rows of ``tokens`` positions (prompt included): train.chunk_size, all rows when it is
        None, and for "auto" what fits in free memory (``auto_chunk_rows``), decided per batch."""
        if self.chunk_size != "auto":
            return int(self.chunk_size or rows)
        responses = int((labels[:, 1:] != IGNORE_INDEX).sum(1).max()) if labels.numel() else 0
        training = torch.is_grad_enabled() and self.prompts.requires_grad
        return auto_chunk_rows(self.lm, rows, tokens, responses, labels.device, training)

    # --- all K x B pairs -------------------------------------------------------------------------

    def pairs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
              query_mask: torch.Tensor) -> PairOutput:
        """Scores and response NLL of every (prompt, example) pair in one LM batch of K*B rows."""
        K, B = self.K, input_ids.shape[0]
        E = self.embed(input_ids)
        with torch.autocast(device_type=input_ids.device.type, enabled=False):
            features = self.retriever.features(*self.query(input_ids, query_mask, E))  # (B, d)
        S = self.retriever.score_features(self.prompts, features)  # (K, B)
        prompt_idx = torch.arange(K, device=input_ids.device).repeat_interleave(B)  # rows k*B + b
        logits, targets = self.pair_logits(prompt_idx, input_ids, attention_mask, labels, E)
        nll = F.cross_entropy(logits.float(), targets, reduction="none").view(K, -1)  # (K, M)
        token_example, _ = response_token_example(labels)  # (M,)
        L = losses.per_example_nll(nll, token_example, B)  # (K, B)
        M = nll.shape[1]
        return PairOutput(S, logits.view(K, M, -1), targets[:M], nll, token_example, L, features)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                query_mask: torch.Tensor, persona_sim: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """All four losses for a batch; ``loss`` is their weighted sum. Shapes: (B, T) inputs,
        persona_sim (B, B) sentence-BLEU similarities for the contrastive loss."""
        cfg, K = self.cfg, self.K
        p = self.pairs(input_ids, attention_mask, labels, query_mask)
        multi = K > 1
        route = losses.routing_probs(p.S, cfg.tau_sim)  # (K, B)
        if cfg.sel_target == "posterior":  # q from the summed NLL, with the routing as prior
            L_sum = losses.per_example_sum(p.nll, p.token_example, input_ids.shape[0])
            q = losses.selection_target(L_sum, cfg.tau_gold, route, bool(cfg.balance_target))
        else:
            q = losses.selection_target(p.L, cfg.tau_gold, None, bool(cfg.balance_target))
        weights = {"retriever": route, "posterior": q}.get(cfg.lm_weighting)
        out = {"llm": losses.routed_lm_loss(p.nll, weights, p.token_example)
               if weights is not None and multi else losses.lm_loss(p.nll)}
        zero = out["llm"] * 0.0
        out["sel"] = zero
        if cfg.lambda_sel > 0 and multi:
            S_all, q_all = p.S, q
            if self.training and cfg.sel_replay > 0:  # re-score recent batches' features against their targets
                if self._replay:
                    feats, targets = zip(*self._replay, strict=True)
                    S_all = torch.cat([self.retriever.score_features(self.prompts, torch.cat(feats)), p.S], 1)
                    q_all = torch.cat([*targets, q], 1)
                # every rank keeps the whole global batch, so replay is the same as in one process
                self._replay.append((distributed.gather_rows(p.features.detach()),
                                     distributed.gather_rows(q.detach().T).T))
            out["sel"] = losses.selection_loss(p.L, S_all, cfg.tau_gold, cfg.tau_sim, cfg.sel_noise_sigma, q=q_all)
        fusion_w = losses.fusion_weights(p.S, cfg.fusion_weights, cfg.tau_sim)
        out["fus"] = losses.fusion_loss(p.logits, p.targets, fusion_w, p.token_example) \
            if cfg.lambda_fus > 0 and multi else zero
        out["bal"] = losses.balance_loss(route, self.route_avg, BALANCE_MOMENTUM) \
            if cfg.lambda_bal > 0 and multi else zero
        if self.training and multi:  # the global batch's average routing, identical on every rank
            batch_route = distributed.gather_rows(route.detach().T).mean(0)
            self.route_avg.mul_(BALANCE_MOMENTUM).add_((1 - BALANCE_MOMENTUM) * batch_route)
        out["ctr"] = losses.contrastive_loss(p.S, losses.contrastive_targets(persona_sim, cfg.ctr_bleu_threshold)) \
            if cfg.lambda_ctr > 0 and multi and persona_sim is not None else zero
        out["loss"] = (cfg.lambda_llm * out["llm"] + cfg.lambda_sel * out["sel"] + cfg.lambda_fus * out["fus"]
                       + cfg.lambda_ctr * out["ctr"] + cfg.lambda_bal * out["bal"])
        return out
