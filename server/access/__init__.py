"""Who may do what: API keys and tokens, browser origins, proxies, limits, where the server may connect out, which
decoder may read an upload."""
