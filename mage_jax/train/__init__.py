"""Training: the loop every job shares (`trainer`), the pure steps, optimizers, checkpoints, preemption, progress
reports, meshes and the builders and config views the jobs use.
"""
