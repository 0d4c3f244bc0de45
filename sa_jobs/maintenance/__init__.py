"""Maintenance beside the worker: rescue expired leases, promote due jobs, leader election."""

from .leader import Maintainer, MaintenanceService

__all__ = ["Maintainer", "MaintenanceService"]
