source .devdeps/env.sh; L=$OUT/all.log; P="OMP_PLACES=cores OMP_PROC_BIND=close"
lscpu | grep -E 'Model name|^CPU\(s\)|Thread|L2|L3' | tr -s ' ' | tee -a $L
PROBE_THREADS=2 OUT=$OUT scripts/device-check.sh cpuprobe | tee -a $L; rm -f $OUT/probe-kc-build.log
(cmake -S . -B bc -G Ninja -DMOE_BACKEND=cpu -DCMAKE_BUILD_TYPE=Release -DMOE_BUILD_TESTS=ON && cmake --build bc) >/tmp/b.log 2>&1 || tail -20 /tmp/b.log
for i in 1 2 3; do env OMP_NUM_THREADS=2 $P timeout 60 ./bc/bench/moe_bench --backend cpu --model mixtral-8x7b,qwen3-30b-a3b --tokens 128,512 --json $OUT/f2.json >>$L 2>&1; done
env OMP_NUM_THREADS=2 $P timeout 120 python3 bench/torch_cpu_peer.py --no-install --reps 3 --model mixtral-8x7b,qwen3-30b-a3b --tokens 128,512 --json $OUT/torch2.json >>$L 2>&1
OMP_NUM_THREADS=16 timeout 90 ./bc/bench/moe_bench --backend cpu --model mixtral-8x7b,qwen3-30b-a3b --tokens 1,16,128,512,4096 --json $OUT/f16.json >>$L 2>&1
OMP_NUM_THREADS=16 timeout 100 python3 bench/torch_cpu_peer.py --no-install --reps 3 --model mixtral-8x7b,qwen3-30b-a3b --tokens 1,16,128,512 --json $OUT/torch16.json >>$L 2>&1
grep -E '%roof|  (128|512|4096) |^mixtral|^qwen3' $L | grep -E 'mixtral|qwen3' | tail -40
timeout 170 ctest --test-dir bc -R '^cpu' -LE huge --output-on-failure >$OUT/ctest.log 2>&1; echo ctest rc=$?; tail -12 $OUT/ctest.log
