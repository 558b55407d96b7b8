"""The epdserve tuner: workload traces now; profiling, simulation, SLO search and Helm export
grow here (see docs/ARCHITECTURE.md)."""
