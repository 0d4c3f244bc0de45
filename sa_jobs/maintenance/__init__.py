"""Services that run on the elected leader only: rescue expired leases, promote due jobs."""

from .leader import Maintainer, MaintenanceService

__all__ = ["Maintainer", "MaintenanceService"]
