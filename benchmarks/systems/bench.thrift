// The benchmark interface for the thriftpy2 peer (benchmarks/systems/thriftpy2_system.py).

struct Item {
  1: i64 i,
  2: double f,
  3: string s,
}

service Bench {
  i64 add(1: i64 a, 2: i64 b),
  binary echo(1: binary data),
  // Thrift has no streams: the whole stream comes back as one list.
  list<Item> items(1: i32 n),
}
