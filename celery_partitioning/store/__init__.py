"""Everything celery-partitioning keeps in Redis: key names, Lua scripts, the lease, dead
letters and parking, in-place retry attempt records, and kombu's broker layout.

No other module builds a Redis key name or sends a script.
"""
