"""The admin API's routes, one module per resource; ``ROUTERS`` in the order the app adds them."""

from __future__ import annotations

from fastapi import APIRouter

from . import jobs, nodes, ops, slots

ROUTERS: tuple[APIRouter, ...] = (ops.router, slots.router, nodes.router, jobs.router)
