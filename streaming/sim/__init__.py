"""A simulated device (`--device sim:<profile>`): the model's calls wait what a measured GPU profile says and return
correctly shaped stand-in results; everything else (sessions, worker, finisher, cost model, server) is the real
code. For designing the schedule and testing the server at production settings without a GPU; its frames carry a
visible "SIMULATED" mark. Never a default, never chosen by `auto`."""
