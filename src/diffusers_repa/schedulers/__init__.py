from .scheduling_sit_ode import ODE_SOLVERS, SiTODEScheduler, SiTODESchedulerOutput
from .scheduling_sit_sde import SiTSDEScheduler, SiTSDESchedulerOutput

__all__ = ["ODE_SOLVERS", "SiTODEScheduler", "SiTODESchedulerOutput", "SiTSDEScheduler", "SiTSDESchedulerOutput"]
