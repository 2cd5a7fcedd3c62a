"""Capacity planner (minimal placeholder until the full planner lands): the engine's page budget."""

from __future__ import annotations

CPU_DEFAULT_KV_BUDGET = 2 << 30  # bytes


def kv_pages_for_budget(model, engine_cfg, budget_bytes: int) -> int:
    per_page = model.kv_bytes_per_token(engine_cfg.kv_cache_dtype) * engine_cfg.page_size
    return max(2, int(budget_bytes // per_page) + 1)  # + the null page


def default_kv_budget_bytes(model, engine_cfg, device: str = "cpu") -> int:
    return CPU_DEFAULT_KV_BUDGET
