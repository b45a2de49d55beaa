"""Benchmark tools beside the runtime (`vexpress-rt bench`): FLOP counts, the CPU latency run, the engine on a GPU,
chunked vs staggered windows, event-loop lag, random-weight models. The engine never imports them."""
