"""The worker agent: join, lease, train DiLoCo rounds with peers, report."""
