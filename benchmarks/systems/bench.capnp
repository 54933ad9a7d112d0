# The benchmark interface for the pycapnp peer (benchmarks/systems/pycapnp_system.py).
@0x907efc5a011a8f9f;

interface Bench {
  add @0 (a :Int64, b :Int64) -> (sum :Int64);
  echo @1 (data :Data) -> (data :Data);

  # A server stream in Cap'n Proto's own style: the client passes a Sink capability and the
  # server pushes one small record per call into it, then returns how many it pushed.
  stream @2 (n :UInt32, sink :Sink) -> (sent :UInt32);

  interface Sink {
    push @0 (i :Int64, f :Float64, s :Text) -> stream;
  }
}
