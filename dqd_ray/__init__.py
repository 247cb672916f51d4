"""dqd-ray."""
