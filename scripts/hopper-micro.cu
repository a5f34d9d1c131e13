// hopper-micro.cu — the numbers a persistent decode design rests on
// (docs/PERF.md, version 8), measured on the card at hand:
//  - streaming bandwidth of G blocks (one per SM) copying disjoint regions
//    through a cp.async ring (8 × 16 KB in flight a block), spread or as
//    thread-block clusters of 8 / 16, and with plain 16-byte loads;
//  - the same from L2-resident data;
//  - a cluster barrier (barrier.cluster arrive + wait), a DSMEM exchange
//    (write, cluster sync, read a neighbour's shared memory, sync), and a
//    grid barrier on an L2 counter (red.release + ld.acquire polling).
// Standalone; on the GPU machine: scripts/gpu-run.sh micro (nvcc there).
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
#define CK(x) do{cudaError_t e=(x); if(e!=cudaSuccess){printf("ERR %s line %d: %s\n",#x,__LINE__,cudaGetErrorString(e)); exit(1);} }while(0)

__device__ __forceinline__ void cpa16(void* s, const void* g){
  unsigned sa=(unsigned)__cvta_generic_to_shared(s);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"::"r"(sa),"l"(g));
}
__device__ __forceinline__ void commit(){asm volatile("cp.async.commit_group;\n");}
template<int N> __device__ __forceinline__ void waitg(){asm volatile("cp.async.wait_group %0;\n"::"n"(N));}

// each block streams bytes_per_block from its own region, ring of STAGES chunks of CH bytes.
template<int STAGES>
__global__ void stream(const uint4* src, size_t per_block_u4, int CHu4, float* sink){
  extern __shared__ uint4 sm[];
  const uint4* p = src + (size_t)blockIdx.x * per_block_u4;
  size_t nch = per_block_u4 / CHu4;
  float acc=0;
  for (int s=0;s<STAGES-1;s++){ if(s<nch) for(int i=threadIdx.x;i<CHu4;i+=blockDim.x) cpa16(&sm[s*CHu4+i], p+(size_t)s*CHu4+i); commit(); }
  for (size_t c=0;c<nch;c++){
    size_t n=c+STAGES-1;
    if(n<nch){ int sl=n%STAGES; for(int i=threadIdx.x;i<CHu4;i+=blockDim.x) cpa16(&sm[sl*CHu4+i], p+n*CHu4+i);} 
    commit();
    waitg<STAGES-1>();
    __syncthreads();
    int sl=c%STAGES; acc += __int_as_float(sm[sl*CHu4+threadIdx.x].x);
    __syncthreads();
  }
  if(acc==12345.f) sink[0]=acc;
}
// register loads, unroll 8
__global__ void streamld(const uint4* src, size_t per_block_u4, float* sink){
  const uint4* p = src + (size_t)blockIdx.x * per_block_u4;
  unsigned acc=0;
  for (size_t i=threadIdx.x; i+7*blockDim.x<per_block_u4; i+=8*blockDim.x){
    uint4 v[8];
#pragma unroll
    for(int u=0;u<8;u++) asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];":"=r"(v[u].x),"=r"(v[u].y),"=r"(v[u].z),"=r"(v[u].w):"l"(p+i+u*blockDim.x));
#pragma unroll
    for(int u=0;u<8;u++) acc^=v[u].x^v[u].w;
  }
  if(acc==12345) sink[0]=acc;
}
__global__ void clbar(int iters, long long* out){
  cg::cluster_group cl = cg::this_cluster();
  long long t0=clock64();
  for(int i=0;i<iters;i++){ asm volatile("barrier.cluster.arrive;\nbarrier.cluster.wait;\n" ::: "memory"); }
  long long t1=clock64();
  if(threadIdx.x==0 && blockIdx.x==0) out[0]=t1-t0;
}
// DSMEM ping-pong chain: each iteration, block r writes value to its smem, cluster sync, reads neighbor's
__global__ void dsmem(int iters, long long* out, float* sink){
  __shared__ float v[64];
  cg::cluster_group cl = cg::this_cluster();
  unsigned r=cl.block_rank(), n=cl.num_blocks();
  float a=r;
  long long t0=clock64();
  for(int i=0;i<iters;i++){
    if(threadIdx.x<64) v[threadIdx.x]=a+threadIdx.x;
    cl.sync();
    float* nb = cl.map_shared_rank(v, (r+1)%n);
    if(threadIdx.x<64) a += nb[threadIdx.x]*0.5f;
    cl.sync();
  }
  long long t1=clock64();
  if(threadIdx.x==0 && blockIdx.x==0) out[0]=t1-t0;
  if(a==1.2345f) sink[0]=a;
}
__global__ void gridbar(int iters, unsigned* ctr, long long* out){
  long long t0=clock64();
  for(int i=0;i<iters;i++){
    __syncthreads();
    if(threadIdx.x==0){
      unsigned target=(i+1)*gridDim.x;
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;"::"l"(ctr):"memory");
      unsigned v; do{ asm volatile("ld.acquire.gpu.global.u32 %0,[%1];":"=r"(v):"l"(ctr):"memory"); }while(v<target);
    }
    __syncthreads();
  }
  long long t1=clock64();
  if(threadIdx.x==0 && blockIdx.x==0) out[0]=t1-t0;
}

int main(){
  cudaDeviceProp pr; CK(cudaGetDeviceProperties(&pr,0));
  int khz = 0;  // (cudaDeviceProp::clockRate is gone in CUDA 13)
  CK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
  printf("%s SMs %d clock %d kHz\n", pr.name, pr.multiProcessorCount, khz);
  size_t total = (size_t)2<<30; // 2 GiB
  uint4* buf; CK(cudaMalloc(&buf,total)); CK(cudaMemset(buf,1,total));
  float* sink; CK(cudaMalloc(&sink,64));
  cudaEvent_t e0,e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  const int ST=8; int CH=16384; // bytes per chunk
  size_t smem = ST*CH;
  CK(cudaFuncSetAttribute(stream<ST>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  CK(cudaFuncSetAttribute(stream<ST>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  int Gs[]={1,2,4,8,16,32,66,132};
  for(int thr: {256,512}) for(int G: Gs) for(int clus: {1,8,16}){
    if(clus>1 && G%clus) continue;
    if(clus>1 && G>32) continue;
    size_t per = (total/ (size_t)G); if(per> (size_t)256<<20) per=(size_t)256<<20; per = per/ CH * CH;
    cudaLaunchConfig_t cfg={}; cfg.gridDim=G; cfg.blockDim=thr; cfg.dynamicSmemBytes=smem;
    cudaLaunchAttribute at[1]; at[0].id=cudaLaunchAttributeClusterDimension; at[0].val.clusterDim.x=clus; at[0].val.clusterDim.y=1; at[0].val.clusterDim.z=1;
    cfg.attrs=at; cfg.numAttrs=1;
    cudaError_t le=cudaLaunchKernelEx(&cfg, stream<ST>, (const uint4*)buf, per/16, CH/16, sink); if(le!=cudaSuccess){printf("G=%d clus=%d launch err %s\n",G,clus,cudaGetErrorString(le)); cudaGetLastError(); continue;}
    CK(cudaDeviceSynchronize());
    cudaEventRecord(e0);
    CK(cudaLaunchKernelEx(&cfg, stream<ST>, (const uint4*)buf, per/16, CH/16, sink));
    cudaEventRecord(e1); CK(cudaEventSynchronize(e1)); float ms; cudaEventElapsedTime(&ms,e0,e1);
    double gbs = (double)per*G/ (ms*1e-3)/1e9;
    printf("cp.async thr=%d G=%3d cluster=%2d: total %.0f GB/s, per block %.1f GB/s\n", thr,G,clus,gbs,gbs/G);
  }
  // L2-resident: every launch re-reads the same 1 MiB a block (launch cost included).
  for(int G: {16,32}) for(int clus: {1,16}) for(int thr:{256,512}) {
    size_t per=(size_t)1<<20;
    cudaLaunchConfig_t cfg={}; cfg.gridDim=G; cfg.blockDim=thr; cfg.dynamicSmemBytes=smem;
    cudaLaunchAttribute at[1]; at[0].id=cudaLaunchAttributeClusterDimension; at[0].val.clusterDim.x=clus; at[0].val.clusterDim.y=1; at[0].val.clusterDim.z=1; cfg.attrs=at; cfg.numAttrs=1;
    for(int w=0;w<3;w++) CK(cudaLaunchKernelEx(&cfg, stream<ST>, (const uint4*)buf, per/16, CH/16, sink));
    CK(cudaDeviceSynchronize()); cudaEventRecord(e0);
    for(int r=0;r<20;r++) CK(cudaLaunchKernelEx(&cfg, stream<ST>, (const uint4*)buf, per/16, CH/16, sink));
    cudaEventRecord(e1); CK(cudaEventSynchronize(e1)); float ms; cudaEventElapsedTime(&ms,e0,e1);
    double gbs=(double)per*G*20/(ms*1e-3)/1e9; printf("L2 cp.async thr=%d G=%d cluster=%d: total %.0f GB/s per block %.1f (incl launch)\n",thr,G,clus,gbs,gbs/G);
  }
  for(int G: Gs){ int thr=512; size_t per = total/G; if(per>(size_t)256<<20) per=(size_t)256<<20; per=per/16/8/thr*8*thr*16;
    streamld<<<G,thr>>>(buf,per/16,sink); CK(cudaDeviceSynchronize());
    cudaEventRecord(e0); streamld<<<G,thr>>>(buf,per/16,sink); cudaEventRecord(e1); CK(cudaEventSynchronize(e1)); float ms; cudaEventElapsedTime(&ms,e0,e1);
    double gbs=(double)per*G/(ms*1e-3)/1e9; printf("ld.v4 thr=%d G=%3d: total %.0f GB/s, per block %.1f GB/s\n",thr,G,gbs,gbs/G);}
  long long* out; CK(cudaMalloc(&out,64)); long long h;
  CK(cudaFuncSetAttribute(clbar, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  CK(cudaFuncSetAttribute(dsmem, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  for(int clus: {2,4,8,16}){
    cudaLaunchConfig_t cfg={}; cfg.gridDim=clus; cfg.blockDim=256; cfg.dynamicSmemBytes=0;
    cudaLaunchAttribute at[1]; at[0].id=cudaLaunchAttributeClusterDimension; at[0].val.clusterDim.x=clus; at[0].val.clusterDim.y=1; at[0].val.clusterDim.z=1; cfg.attrs=at; cfg.numAttrs=1;
    int it=10000;
    cudaError_t le=cudaLaunchKernelEx(&cfg, clbar, it, out); if(le!=cudaSuccess){printf("clbar %d: %s\n",clus,cudaGetErrorString(le)); cudaGetLastError(); continue;}
    CK(cudaDeviceSynchronize()); CK(cudaMemcpy(&h,out,8,cudaMemcpyDeviceToHost)); printf("cluster %2d barrier: %.0f cycles/iter (%.0f ns @ clock)\n",clus,(double)h/it,(double)h/it/(khz*1e-6));
    CK(cudaLaunchKernelEx(&cfg, dsmem, it, out, sink)); CK(cudaDeviceSynchronize()); CK(cudaMemcpy(&h,out,8,cudaMemcpyDeviceToHost)); printf("cluster %2d dsmem write/sync/read/sync: %.0f cycles/iter\n",clus,(double)h/it);
  }
  unsigned* ctr; CK(cudaMalloc(&ctr,4));
  for(int G: {16,66,132}){ CK(cudaMemset(ctr,0,4)); int it=2000; gridbar<<<G,256>>>(it,ctr,out); CK(cudaDeviceSynchronize()); CK(cudaMemcpy(&h,out,8,cudaMemcpyDeviceToHost)); printf("grid barrier G=%d: %.0f cycles/iter\n",G,(double)h/it);}
  return 0;
}
