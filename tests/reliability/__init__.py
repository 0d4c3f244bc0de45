"""Reliability and security suite (issue 6): real processes, a real server, real faults.

Long runs are marked ``slow``; the default run executes a shortened version of every
scenario with the same assertions. Figures and commands: ``docs/reliability.md``.
"""
