"""The engine core in its own process: the step loop apart from the API server.

``loop.EngineCoreLoop`` drives an ``LLMEngine`` from plain commands and collects plain outputs;
``process`` runs it in a spawned process behind ZeroMQ sockets; ``client.EngineCoreClient`` is
the API process's end; ``inproc.InProcessCore`` runs the same loop on a thread instead.
``replicas`` starts one core per data-parallel replica, each on its own devices;
``messages`` holds every message that crosses the process boundary (msgspec, msgpack);
``detokenize`` decodes text in the API process for requests the core runs without it.
"""
