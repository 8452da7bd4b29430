# Flag sets of every method in DESIGN §1, as one implementation configured by flags.
# Usage: source scripts/methods.sh; method_flags NAME N_LAYERS   (prints the adapter flags)
method_flags() {
  local name=$1 L="0-$2"
  local lora="--lora_layers $L --lora_rank 8 --lora_alpha 8 --lora_targets Q,K,V,O,FFN_DOWN"
  local soft="$lora --expert_num 1 --hydra_moe True --p_adapter_layers $L --p_adapter_size 16 --p_adapter_hydra True"
  case $name in
    soft_moa)     echo "$soft --prompt_layers $L --prompt_len 10 --swi_x 4 --type_router soft" ;;   # the paper's math setting
    soft_moa_cs)  echo "$soft --prompt_layers $L --prompt_len 10 --swi_x 0 --type_router soft" ;;   # the commonsense setting
    sparse_moa)   echo "$soft --swi_x 4 --type_router sparse --max_threshold 0.5" ;;
    instance_moa) echo "$soft --prompt_layers $L --prompt_len 10 --swi_x 4 --type_router instance" ;;
    unipeft)      echo "$lora --p_adapter_layers $L --p_adapter_size 16 --prompt_layers $L --prompt_len 10 --type_router unipeft" ;;
    lora)         echo "$lora --type_router none" ;;
    lora_r16)     echo "--lora_layers $L --lora_rank 16 --lora_alpha 16 --lora_targets Q,K,V,O,FFN_DOWN --type_router none" ;;
    hydralora)    echo "$lora --expert_num 8 --hydra_moe True --type_router none" ;;
    molora)       echo "$lora --expert_num 8 --type_router none" ;;
    topk)         echo "$lora --expert_num 8 --expert_router topk --top_k 2 --type_router none" ;;
    adamole)      echo "$lora --expert_num 8 --expert_router adamole --type_router none" ;;
    p_adapter)    echo "--p_adapter_layers $L --p_adapter_size 16 --type_router none" ;;
    prompt)       echo "--prompt_layers $L --prompt_len 10 --type_router none" ;;
    *) echo "unknown method '$name'; known: soft_moa soft_moa_cs sparse_moa instance_moa unipeft lora lora_r16 hydralora molora topk adamole p_adapter prompt" >&2; return 2 ;;
  esac
}
