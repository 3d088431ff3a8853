"""simul_agents."""
