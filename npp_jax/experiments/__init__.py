"""Experiments that drive npp_jax's public training entry point and report measured figures.

`digits_npp_vs_ntp`: NPP against next-token prediction on the CPU demo's digits, several budgets.
"""
